"""What a user runs to see the toolkit work, kept out of the library modules: the main job (demo) and its report,
replicate, compare, the digit-grid data set and the small base."""
