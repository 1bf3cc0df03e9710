"""The one definition of every wire shape."""
