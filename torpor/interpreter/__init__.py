"""The code interpreter's in-sandbox server (`server.py`): shipped into the
`code-interpreter` template and run there; the host never imports it."""
