"""Values that several packages must agree on (data collation, relevance, the train loop, the builder)."""

IGNORE_INDEX = -100  # label of positions without loss (the transformers convention)
RELEVANCE_GROUP = "relevance"  # name of the relevance modules' report row and AdamW parameter group
COMPONENT_NAMES = ("vision", "projector", "cross_attention", "language")  # the parts of every VLM
METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")  # caption metrics, in order
BEST_METRICS = ("eval_loss", *METRIC_NAMES)  # what train.keep_best watches; eval_loss is the one lower is better
# model.attn_implementation: transformers' names (a hub kernel `org/name` is accepted as well)
ATTENTION_IMPLEMENTATIONS = (
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "flex_attention",
    "paged|eager",
)
