"""LIMA data: formatting (`format`), the tokenizer (`tokenizer`), the Grain pipeline (`pipeline`),
the demo dataset (`demo`) and the Hugging Face download helper (`download`)."""
