"""Reading and writing files: one document reader, atomic files and folders that keep users' files."""
