"""The search service over a collection index: `python -m dolg_jax.serve` (see __main__).

app.py       routes, bad-input answers, token, body limit (FastAPI on uvicorn)
service.py   the opened index, micro-batched extraction + search, reloads, images by row id
batching.py  the micro-batcher;  backends.py  FAISS or Milvus candidates
metrics.py   Prometheus text;   page.py  the web page (one inline HTML file)
"""
