from rbee_hive.daemon.serve import main

main()
