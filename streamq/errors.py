class StreamqError(Exception):
    """A user-facing error: what went wrong (naming the file/tensor/key) and how to fix it."""
    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint
    def __str__(self):
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message
