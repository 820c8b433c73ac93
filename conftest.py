# Puts the project root on sys.path so tests import `models`, `utils` as a user would from the root.
