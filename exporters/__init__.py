"""exporters/: drafts into what vLLM and TGI load, checked, and pushed to the Hub (issue #4)."""
