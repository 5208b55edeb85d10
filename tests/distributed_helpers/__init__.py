"""Scripts and launchers for the multi-process strategy tests."""
