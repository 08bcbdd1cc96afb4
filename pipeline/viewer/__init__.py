"""`cytopipe view`: a local deep-zoom viewer of a scored slide, with its cells as an overlay and
labelling written by the server to the report folder's labels.csv (the file `cytopipe harvest` reads)."""
