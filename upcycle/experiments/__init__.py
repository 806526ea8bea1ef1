"""What a user runs to see the toolkit work, kept out of the library modules: the main job (demo) and its report,
replicate, compare, the digit-grid data set, digit accuracy per grid position and the small base."""
