"""Caption metrics (missed / incorrect / hallucinated events, repetition), judges, QA accuracy, reports."""
