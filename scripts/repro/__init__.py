"""The reproduction tool behind scripts/table*.sh, figures.sh and compare_gamma.sh
(``python -m scripts.reproduce``): training steps, evaluation, tables and figures."""
