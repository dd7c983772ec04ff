"""The paper's reported numbers as package data: ``table{1,2,3}.csv`` (read them with
:func:`analysis.paper.load_paper`; the columns are described there)."""
