"""Test package (an __init__ so that `tests._numerics` never resolves to another installed `tests`)."""
