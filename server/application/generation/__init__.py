"""The generation use case's shared parts: requests and their validation, the job path every
generation command takes, and the recorded lifecycle. The commands and their handlers are in
`application/commands/generation.py`."""
