"""What the kernel families share (families never import each other; they import this)."""
