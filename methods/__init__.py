"""Built-in methods, one module each; installed as ``kdzoo.methods``."""
