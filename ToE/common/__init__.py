"""What every ToE trainer shares: flags, data folders, checkpoints, distributed set-up, logs."""
