"""Runtime: custom ops and kernels, paged attention and collectives (the bottom layer), and the
engine (``runtime.engine``: scheduler, runner, ``LLM``) at the top. Importing this package loads
neither; ``from infer import LLM`` is the engine's entry point."""
