"""Loading base models and tokenizers (and the offline tiny model); attention over packed documents."""
