"""Front ends for a checkout: ``python -m experiments.<name>`` runs ``so3lib <command>`` (experiments.ablation is
``so3lib sweep``). The code lives in `so3lib.workflows`; the installed wheel ships so3lib only."""
