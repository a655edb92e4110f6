"""Synonyms and narrower terms of ontology terms (Cell Ontology, UBERON, MONDO) from the ontology files
CELLxGENE ships with ``cellxgene-ontology-guide``, read offline.

The prompt resolver takes a model's labels' synonyms ("type II alveolar epithelial cell", "neutrophil
leukocyte", "adenocarcinoma of lung") and the terms below them ("Kupffer cell" for macrophage,
"sigmoid colon" for large intestine, "Crohn ileitis" for Crohn disease) from here, so that an atlas
of any labels (the real Census has hundreds of cell types) is named by the words its ontologies give,
not only by the project's hand-written tables. Which of them the resolver keeps is decided in
:func:`clopdit_dist.data.conditions.resolver_names`: the ontology files list exact and related synonyms
alike, with no type to tell them apart, and some related ones name other cells ("plasmacytoid T
cell" for the plasmacytoid dendritic cell).
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _parser():
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    return OntologyParser()


@functools.lru_cache(maxsize=4096)
def term_synonyms(term_id: str) -> tuple[str, ...]:
    """The synonyms the shipped ontology gives ``term_id`` ("CL:0002063"); () for a term it lacks (a
    newer release's, or "PATO:0000461" for normal, which has none)."""
    try:
        return tuple(_parser().get_term_synonyms(term_id))
    except (ValueError, KeyError):
        return ()


@functools.lru_cache(maxsize=4096)
def term_label(term_id: str) -> str | None:
    """The label the shipped ontologies give ``term_id`` ("CL:0000236" -> "B cell"), None for a term they lack."""
    try:
        return _parser().get_term_label(term_id)
    except (ValueError, KeyError):
        return None


ONTOLOGY_OF = {"cell_type": "CL", "tissue_general": "UBERON", "disease": "MONDO"}


def term_id(label: str, field: str) -> str | None:
    """The term id of ``label`` in the ontology of condition field ``field`` ("cardiac muscle cell" ->
    "CL:0000746"), None where the shipped ontology has no term of that label."""
    return _parser().get_term_id_by_label(label, ONTOLOGY_OF[field])


def narrower_terms(terms: dict[str, str]) -> dict[str, list[str]]:
    """label -> the names (label and synonyms) of the ontology terms below the label's term ``terms[label]``
    (is_a and part_of, as the shipped ontology relates them: "Kupffer cell" below macrophage, "sigmoid colon"
    below large intestine), each under the label whose term is nearest above it. A term as near to two labels
    ("CD8-positive, alpha-beta regulatory T cell": below the CD8 T cell and the regulatory T cell), and the
    labels' own terms, are left out."""
    p, own = _parser(), set(terms.values())
    label_of = {t: label for label, t in terms.items()}
    below: set[str] = set()
    for term in own:
        try:
            below.update(p.get_term_descendants(term))
        except (ValueError, KeyError):
            continue
    out: dict[str, list[str]] = {}
    for d in sorted(below - own):
        up = {t: n for t, n in p.get_term_ancestors_with_distances(d).items() if t in label_of}
        nearest = [t for t, n in up.items() if n == min(up.values())]
        if len(nearest) == 1:
            out.setdefault(label_of[nearest[0]], []).extend([p.get_term_label(d), *term_synonyms(d)])
    return out
