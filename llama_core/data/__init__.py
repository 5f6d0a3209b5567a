"""Data stages: Alpaca -> conversation JSON (`llama_core.data.alpaca_converter`), conversations or
wikitext -> MindRecord (`llama_core.data.llama_preprocess`, built from `prompts`, `chat`, `masking`,
`wikitext`, `tokenizer`, `ordered_pool` and `mindrecord_sink`)."""
