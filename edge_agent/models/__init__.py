"""Model directories: the manifest (the daemon's one door), the int8 encoder, and the build (never on the run path)."""
