from rbee_keeper.queen.serve import main

main()
