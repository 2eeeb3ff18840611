"""`gptforge serve`: an OpenAI-compatible HTTP server (app.py) over a continuous-batching engine (engine.py)."""
