"""Text corpora for training and evaluating SAEs: the general-English corpus built from packages
fetched with pip, apt and npm (``corpus``; the packages themselves: ``packages``), and the reader of R's lazy-load databases that one of its
sources ships in (``rdata``). Nothing here knows SAEs, plans or servers."""
