"""``raytuner generate``: images from a base model or a trained LoKr adapter, one or many.

One prompt renders in-process; a prompts file renders on a Ray Data actor pool, one pipeline per
actor (one per GPU of the cluster), with a JSON index that makes the run resumable.
"""
