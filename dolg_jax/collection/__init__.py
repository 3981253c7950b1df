"""Your own collection: index a folder of images (`build`), search it (`query`), on disk (`store`).

Commands: `python -m dolg_jax.index` (dolg_jax/index.py) and `python -m dolg_jax.search`
(dolg_jax/search.py). Modules: `files` (which files are images), `reading` (one file -> image or
reason), `store` (the index directory's format), `columns` (its row table, rows.arrow),
`faiss_index` (the search structure), `build` (the indexing library), `query` (the Python search
API), `html_report` (report.html).
"""
