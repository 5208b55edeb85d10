"""What several test files share: the bundled corpus prepared into a store (``corpus``) and
a plain Lightning project that meets our contracts without importing the library
(``tiny_project``). ``tests/conftest.py`` turns the store into a session fixture."""
