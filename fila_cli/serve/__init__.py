"""``fila serve``: one process holds one model and answers over HTTP.

    engine.py         the one door into the question-answering library (qa)
    scheduler.py      the bounded queue; the preparing thread (render, encode) and the LLM thread
    app.py            the FastAPI app: /v1/ask, /v1/models, /health, error handlers
    chat_api.py       /v1/chat/sessions: `fila chat` over HTTP
    openai_compat.py  /v1/chat/completions for OpenAI clients
    limits.py, http_errors.py, responses.py, listen.py, settings.py: the pieces around them
    client.py         the CLI's --server side (standard library only)
    keepalive.py      `fila ask --keep-alive`: a background server on a per-user Unix socket
"""
