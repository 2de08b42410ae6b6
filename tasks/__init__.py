"""Built-in tasks: generated problems with known answers and known information-dense spans."""
