"""Pure folds of ledger events into session state, with rebuild and point-in-time replay."""
