"""ibbench."""
