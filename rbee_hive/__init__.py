"""rbee-hive: the per-host half of rbee — models, GPU inventory, worker lifecycle."""
