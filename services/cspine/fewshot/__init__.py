"""Few-shot classification: prototype sets from support cases, and the support set cspine ships with."""
