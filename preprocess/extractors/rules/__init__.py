"""Rule extractors: code (``code``), math (``math``) and the ``rules`` extractor combining them."""
