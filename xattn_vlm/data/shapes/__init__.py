"""The shapes world: a synthetic vision-language world that needs no download (``world``), its
record sources for training (``records``) and its tokenizer, learned from its text
(``tokenizer``)."""
