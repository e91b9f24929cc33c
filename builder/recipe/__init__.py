"""Schema (the one table), load (render + parse), validate, templating, docs."""
