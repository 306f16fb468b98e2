"""Development aids: the tiny random models of the tests and the demo."""
