"""Built-in backends, one module each; every module defines ``BACKEND``. The registry names them."""
