"""The LLM judge: MT-Bench grading (single, pairwise) and side-by-side grading through any OpenAI-compatible server."""
