"""Key store and key discovery."""
