"""What every part of the toolkit shares: the one error type, command-line support, atomic files and directories,
step records for resumable work, and decoding the files users hand in."""
