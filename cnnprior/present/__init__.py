"""Presentation: colormaps, overlays, contact sheets and charts (`viz`, imports matplotlib), reports as
Markdown/HTML (`report`). Imported only by the stages that write pictures or reports."""
