"""The biology the synthetic atlas is made of: a cell-type lineage tree with marker programs,
tissues with their composition, diseases that shift programs of some cell types only,
discrete sub-states within some types, and continuous within-type programs.

Everything here is declarative; :mod:`clopdit_dist.data.synthetic` turns it into counts.
Labels and ontology ids follow the CELLxGENE schema (Cell Ontology, UBERON, MONDO, EFO,
PATO) so that captions and filters read like the real Census. Marker genes are the canonical
ones from the literature (e.g. the Human Lung Cell Atlas, Travaglini et al. 2020; the
Tabula Sapiens, 2022); the synthetic atlas uses them so that captions such as
"markers: CD8A, GZMK" mean what a biologist expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CellType:
    """A node of the lineage tree. Its expression program is the sum of its ancestors'
    programs and its own ``markers``, so children share their parent's program."""

    name: str
    ontology_id: str
    parent: str | None
    markers: tuple[str, ...] = ()
    leaf: bool = True
    cycling: float = 0.02  # probability that a cell of this type is in the cell cycle
    library_factor: float = 1.0  # relative RNA content
    activatable: bool = False  # immune activation program applies


def _ct(name, oid, parent, markers, **kw) -> CellType:
    return CellType(name, oid, parent, tuple(markers.split()), **kw)


# Internal nodes (leaf=False) are programs only; cells are drawn from leaves.
CELL_TYPES: tuple[CellType, ...] = (
    _ct("immune cell", "CL:0000738", None, "PTPRC CORO1A LCP1 ARHGDIB", leaf=False),
    _ct("lymphocyte", "CL:0000542", "immune cell", "CD52 CD37 RAC2", leaf=False),
    _ct("T cell", "CL:0000084", "lymphocyte", "CD3E CD3D CD3G CD2 CD247 IL7R", leaf=False, activatable=True),
    _ct("CD4-positive, alpha-beta T cell", "CL:0000624", "T cell", "CD4 CCR7 LTB MAL TCF7", activatable=True),
    _ct("regulatory T cell", "CL:0000815", "T cell", "CD4 FOXP3 IL2RA CTLA4 TIGIT IKZF2", activatable=True),
    _ct("CD8-positive, alpha-beta T cell", "CL:0000625", "T cell", "CD8A CD8B GZMK GZMA CCL5 CST7", activatable=True),
    _ct("natural killer cell", "CL:0000623", "lymphocyte", "NKG7 GNLY KLRD1 KLRF1 PRF1 GZMB FCGR3A", activatable=True),
    _ct("B cell", "CL:0000236", "lymphocyte", "MS4A1 CD79A CD79B CD19 BANK1", leaf=False, activatable=True),
    _ct("naive B cell", "CL:0000788", "B cell", "IGHD TCL1A FCER2 IGHM", activatable=True),
    _ct("memory B cell", "CL:0000787", "B cell", "CD27 AIM2 TNFRSF13B", activatable=True),
    _ct("plasma cell", "CL:0000786", "lymphocyte", "JCHAIN MZB1 IGHG1 XBP1 SDC1 DERL3", library_factor=2.0, cycling=0.05),
    _ct("myeloid cell", "CL:0000763", "immune cell", "LYZ TYROBP FCER1G AIF1", leaf=False),
    _ct("classical monocyte", "CL:0000860", "myeloid cell", "CD14 S100A8 S100A9 VCAN FCN1", activatable=True),
    _ct("non-classical monocyte", "CL:0000875", "myeloid cell", "FCGR3A MS4A7 CDKN1C LST1", activatable=True),
    _ct("macrophage", "CL:0000235", "myeloid cell", "CD68 C1QA C1QB C1QC APOE", library_factor=1.5),
    _ct("alveolar macrophage", "CL:0000583", "macrophage", "MARCO FABP4 PPARG INHBA", library_factor=1.6),
    _ct("conventional dendritic cell", "CL:0000990", "myeloid cell", "CLEC10A FCER1A CD1C CLEC9A"),
    _ct("plasmacytoid dendritic cell", "CL:0000784", "immune cell", "LILRA4 IL3RA CLEC4C IRF7 TCF4"),
    _ct("mast cell", "CL:0000097", "immune cell", "TPSAB1 CPA3 KIT MS4A2 HDC"),
    _ct("neutrophil", "CL:0000775", "myeloid cell", "CSF3R FCGR3B CXCR2 S100A12", library_factor=0.4),
    _ct("hematopoietic stem cell", "CL:0000037", "immune cell", "CD34 PROM1 SPINK2 CRHBP", cycling=0.3),
    _ct("epithelial cell", "CL:0000066", None, "EPCAM KRT8 KRT18 CLDN4", leaf=False),
    _ct("lung epithelial cell", "CL:0000082", "epithelial cell", "SFTA2 NAPSA", leaf=False),
    _ct("type II pneumocyte", "CL:0002063", "lung epithelial cell", "SFTPC SFTPB SFTPA1 LAMP3 ABCA3", library_factor=1.4),
    _ct("type I pneumocyte", "CL:0002062", "lung epithelial cell", "AGER EMP2 CAV1 CLIC5"),
    _ct("ciliated cell", "CL:0000064", "epithelial cell", "FOXJ1 CAPS TPPP3 PIFO RSPH1"),
    _ct("club cell", "CL:0000158", "lung epithelial cell", "SCGB1A1 SCGB3A1 BPIFB1"),
    _ct("basal cell", "CL:0000646", "epithelial cell", "KRT5 TP63 KRT15 KRT17", cycling=0.15),
    _ct("hepatocyte", "CL:0000182", "epithelial cell", "ALB APOA1 TTR SERPINA1 APOC3 FGB", library_factor=2.0),
    _ct("cholangiocyte", "CL:1000488", "epithelial cell", "KRT19 KRT7 SOX9 SPP1"),
    _ct("enterocyte", "CL:0000584", "epithelial cell", "FABP1 VIL1 CDH17 CA1 SLC26A3"),
    _ct("goblet cell", "CL:0000160", "epithelial cell", "MUC2 TFF3 SPINK4 ZG16 CLCA1"),
    _ct("keratinocyte", "CL:0000312", "epithelial cell", "KRT14 KRT1 KRT10 DMKN KRTDAP", cycling=0.05),
    _ct("melanocyte", "CL:0000148", None, "PMEL MLANA TYRP1 DCT TYR"),
    _ct("stromal cell", "CL:0000499", None, "VIM SPARC IGFBP7", leaf=False),
    _ct("fibroblast", "CL:0000057", "stromal cell", "COL1A1 COL1A2 DCN LUM COL3A1"),
    _ct("endothelial cell", "CL:0000115", "stromal cell", "PECAM1 VWF CDH5 CLDN5 EGFL7"),
    _ct("smooth muscle cell", "CL:0000192", "stromal cell", "ACTA2 MYH11 DES CNN1 TAGLN"),
    _ct("pericyte", "CL:0000669", "stromal cell", "RGS5 PDGFRB KCNJ8 HIGD1B"),
)

CELL_TYPE_BY_NAME = {c.name: c for c in CELL_TYPES}
LEAF_TYPES = tuple(c for c in CELL_TYPES if c.leaf)


def lineage(name: str) -> list[CellType]:
    """Root-to-node path of a cell type."""
    path = []
    node: str | None = name
    while node is not None:
        ct = CELL_TYPE_BY_NAME[node]
        path.append(ct)
        node = ct.parent
    return path[::-1]


@dataclass(frozen=True)
class Tissue:
    """A ``tissue_general`` value, its finer ``tissue`` labels, and the relative abundance of
    each cell type there (types not listed are absent)."""

    name: str
    ontology_id: str
    sub_tissues: tuple[str, ...]
    composition: dict[str, float] = field(default_factory=dict)


_IMMUNE_RESIDENT = {
    "CD4-positive, alpha-beta T cell": 4, "CD8-positive, alpha-beta T cell": 3, "regulatory T cell": 0.6,
    "natural killer cell": 1.5, "naive B cell": 1, "memory B cell": 0.6, "plasma cell": 0.5,
    "macrophage": 3, "classical monocyte": 1.5, "conventional dendritic cell": 0.5,
    "plasmacytoid dendritic cell": 0.12, "mast cell": 0.2,
}
_STROMA = {"fibroblast": 4, "endothelial cell": 5, "smooth muscle cell": 1.5, "pericyte": 1}

TISSUES: tuple[Tissue, ...] = (
    Tissue("lung", "UBERON:0002048", ("lung", "lung parenchyma", "upper lobe of left lung"), {
        **_IMMUNE_RESIDENT, **_STROMA, "alveolar macrophage": 8, "type II pneumocyte": 8, "type I pneumocyte": 3,
        "ciliated cell": 2, "club cell": 1.5, "basal cell": 1, "neutrophil": 1}),
    Tissue("blood", "UBERON:0000178", ("blood", "venous blood"), {
        "CD4-positive, alpha-beta T cell": 14, "CD8-positive, alpha-beta T cell": 8, "regulatory T cell": 1,
        "natural killer cell": 5, "naive B cell": 4, "memory B cell": 2, "plasma cell": 0.2,
        "classical monocyte": 12, "non-classical monocyte": 2.5, "conventional dendritic cell": 0.6,
        "plasmacytoid dendritic cell": 0.25, "neutrophil": 3, "hematopoietic stem cell": 0.08}),
    Tissue("liver", "UBERON:0002107", ("liver", "caudate lobe of liver"), {
        **_IMMUNE_RESIDENT, **_STROMA, "hepatocyte": 22, "cholangiocyte": 3}),
    Tissue("large intestine", "UBERON:0000059", ("transverse colon", "sigmoid colon", "rectum"), {
        **_IMMUNE_RESIDENT, **_STROMA, "enterocyte": 14, "goblet cell": 6, "plasma cell": 4}),
    Tissue("skin of body", "UBERON:0002097", ("skin of body", "skin of abdomen", "skin of leg"), {
        **_IMMUNE_RESIDENT, **_STROMA, "keratinocyte": 22, "melanocyte": 0.6, "basal cell": 2}),
    Tissue("lymph node", "UBERON:0000029", ("lymph node", "mesenteric lymph node"), {
        "CD4-positive, alpha-beta T cell": 16, "CD8-positive, alpha-beta T cell": 6, "regulatory T cell": 2,
        "natural killer cell": 1.5, "naive B cell": 14, "memory B cell": 6, "plasma cell": 1,
        "macrophage": 2, "conventional dendritic cell": 1.5, "plasmacytoid dendritic cell": 0.3,
        "endothelial cell": 1, "fibroblast": 1}),
)
TISSUE_BY_NAME = {t.name: t for t in TISSUES}


@dataclass(frozen=True)
class Disease:
    """A disease state: where it occurs, the program it switches on in which cell types,
    and how it shifts composition (multiplicative weights)."""

    name: str
    ontology_id: str
    tissues: tuple[str, ...]
    program: tuple[str, ...]
    affects: tuple[str, ...]  # cell types (or internal lineage nodes) whose expression shifts
    composition: dict[str, float] = field(default_factory=dict)


NORMAL = Disease("normal", "PATO:0000461", (), (), ())
# Every tissue has at least two diseases and most diseases occur in two tissues, so that the
# studies (each with its own tissue and disease, see synthetic._make_studies) can hold out a
# disease in a tissue where training saw it only elsewhere: every label seen, the combination not.
DISEASES: tuple[Disease, ...] = (
    NORMAL,
    Disease("COVID-19", "MONDO:0100096", ("lung", "blood", "liver"),  # autopsy atlases sample the liver too
            tuple("ISG15 IFI6 IFI27 MX1 IFIT1 IFIT3 IFI44L RSAD2 OAS1".split()),
            ("immune cell", "epithelial cell"),
            {"classical monocyte": 2.0, "plasma cell": 3.0, "neutrophil": 2.5, "type I pneumocyte": 0.5}),
    Disease("lung adenocarcinoma", "MONDO:0005061", ("lung", "lymph node"),  # lymph node metastases
            tuple("CEACAM5 CEACAM6 MKI67 TOP2A MUC5AC AGR2 SPP1 MMP7".split()),
            ("type II pneumocyte", "club cell", "macrophage"),
            {"type II pneumocyte": 2.5, "CD8-positive, alpha-beta T cell": 1.8, "regulatory T cell": 2.5}),
    Disease("ulcerative colitis", "MONDO:0005101", ("large intestine", "blood"),
            tuple("LCN2 DUOX2 REG1A REG4 S100A8 CXCL8 IL1B".split()),
            ("enterocyte", "goblet cell", "myeloid cell"),
            {"goblet cell": 0.4, "neutrophil": 5.0, "plasma cell": 2.0, "classical monocyte": 2.0}),
    Disease("psoriasis", "MONDO:0005083", ("skin of body", "blood"),
            tuple("KRT16 KRT6A S100A7 SERPINB4 PI3 IL36G".split()),
            ("keratinocyte",),
            {"keratinocyte": 1.3, "CD4-positive, alpha-beta T cell": 2.0}),
    Disease("Crohn disease", "MONDO:0005011", ("large intestine", "lymph node"),  # and mesenteric nodes
            tuple("CXCL9 CXCL10 IDO1 UBD DMBT1 NOS2".split()),
            ("enterocyte", "goblet cell", "myeloid cell", "T cell"),
            {"plasma cell": 1.8, "classical monocyte": 1.8, "CD8-positive, alpha-beta T cell": 1.5}),
    Disease("systemic lupus erythematosus", "MONDO:0007915", ("blood", "skin of body"),
            tuple("IFI44L SIGLEC1 LY6E IFI27 OAS3 EPSTI1 HERC5".split()),
            ("immune cell", "keratinocyte"),
            {"plasma cell": 2.5, "plasmacytoid dendritic cell": 0.5, "non-classical monocyte": 0.7}),
    Disease("non-alcoholic fatty liver disease", "MONDO:0013209", ("liver",),
            tuple("PLIN2 CD36 APOA4 TREM2 GPNMB CD9 LPL".split()),
            ("hepatocyte", "macrophage"),
            {"macrophage": 1.8, "hepatocyte": 0.8}),
)
DISEASE_BY_NAME = {d.name: d for d in DISEASES}


@dataclass(frozen=True)
class SubState:
    """A discrete state within a cell type (e.g. naive vs effector memory T cells): its share
    of the type's cells and the gene module it switches on. Captions do not name states, so
    they are structure a generator must find in the counts, not read in the prompt."""

    name: str
    weight: float
    genes: tuple[str, ...]


def _ss(name, weight, genes) -> SubState:
    return SubState(name, weight, tuple(genes.split()))


SUB_STATES: dict[str, tuple[SubState, ...]] = {
    "CD4-positive, alpha-beta T cell": (_ss("naive", 0.5, "SELL LEF1 NOSIP"), _ss("effector memory", 0.4,
                                        "ANXA1 S100A4 KLRB1"), _ss("follicular helper", 0.1, "CXCL13 PDCD1 ICOS")),
    "CD8-positive, alpha-beta T cell": (_ss("effector memory", 0.55, "GZMK CD27 CXCR4"),
                                        _ss("cytotoxic effector", 0.35, "GZMH GZMB FGFBP2 CX3CR1"),
                                        _ss("exhausted", 0.1, "HAVCR2 LAG3 TOX")),
    "natural killer cell": (_ss("CD56 dim", 0.85, "FCER1G SPON2"), _ss("CD56 bright", 0.15, "XCL1 XCL2 NCAM1")),
    "classical monocyte": (_ss("classical", 0.6, "S100A12 VCAN"), _ss("inflammatory", 0.25, "CCL3 CCL4 NR4A2 TNFAIP3"),
                           _ss("MHC-II high", 0.15, "HLA-DRA CD74 HLA-DQA1")),
    "macrophage": (_ss("resident", 0.6, "LYVE1 MRC1 CD163 F13A1"), _ss("monocyte-derived", 0.4, "FCN1 ITGAX CCL2")),
    "fibroblast": (_ss("universal", 0.45, "PI16 MFAP5 CD248"), _ss("inflammatory", 0.35, "CXCL12 C7 APOD CFD"),
                   _ss("myofibroblast", 0.2, "POSTN CTHRC1 COL11A1")),
    "endothelial cell": (_ss("capillary", 0.5, "CA4 APLNR"), _ss("venous", 0.3, "ACKR1 SELP"),
                         _ss("arterial", 0.2, "GJA5 HEY1 SEMA3G")),
    "keratinocyte": (_ss("basal", 0.35, "COL17A1 CXCL14 KRT15"), _ss("spinous", 0.45, "KRTDAP SBSN"),
                     _ss("granular", 0.2, "LOR FLG IVL")),
    "hepatocyte": (_ss("pericentral", 0.4, "CYP2E1 GLUL CYP1A2 OAT"), _ss("periportal", 0.4, "CPS1 HAL SDS HAMP"),
                   _ss("midzonal", 0.2, "HINT1 COX7C")),
    "enterocyte": (_ss("immature", 0.3, "OLFM4 LGR5 ASCL2"), _ss("mature", 0.6, "SLC26A2 AQP8 CEACAM7"),
                   _ss("BEST4+", 0.1, "BEST4 OTOP2 CA7")),
}

# Continuous programs within a type: cells of one type are not clones.
CELL_CYCLE_S = tuple("PCNA MCM2 MCM5 TYMS FEN1 GINS2 RRM2".split())
CELL_CYCLE_G2M = tuple("MKI67 TOP2A CCNB1 CDK1 CENPF UBE2C BIRC5".split())
ACTIVATION = tuple("CD69 FOS JUN JUNB EGR1 NR4A1 IFNG TNF IER2".split())
STRESS = tuple("HSPA1A HSPA1B DNAJB1 HSPH1 HSP90AA1".split())
MITOCHONDRIAL = ("MT-CO1", "MT-CO2", "MT-ND1", "MT-ND4", "MT-CYB", "MT-ATP6")
HOUSEKEEPING = tuple("ACTB GAPDH B2M TMSB4X EEF1A1 RPL13 RPS18 FTL FTH1 MALAT1".split())
SEX_GENES = {"female": ("XIST", "TSIX"), "male": ("RPS4Y1", "DDX3Y", "UTY", "KDM5D", "EIF1AY")}

ASSAYS = {  # name: (ontology id, median UMIs per cell, sd of log library size)
    "10x 3' v3": ("EFO:0009922", 6000.0, 0.45),
    "10x 5' v2": ("EFO:0009900", 3500.0, 0.5),
}
SEXES = {"female": "PATO:0000383", "male": "PATO:0000384"}
DEVELOPMENT_STAGES = ("20-year-old stage", "35-year-old stage", "50-year-old stage", "65-year-old stage",
                      "80-year-old stage")
ETHNICITIES = ("European", "Asian", "African American", "Hispanic or Latin American", "unknown")


def named_genes() -> list[str]:
    """Every gene symbol the programs above use, in a stable order."""
    seen: dict[str, None] = {}
    groups = [HOUSEKEEPING, MITOCHONDRIAL, CELL_CYCLE_S, CELL_CYCLE_G2M, ACTIVATION, STRESS, *SEX_GENES.values()]
    groups += [c.markers for c in CELL_TYPES] + [d.program for d in DISEASES]
    groups += [s.genes for states in SUB_STATES.values() for s in states]
    for group in groups:
        for g in group:
            seen.setdefault(g, None)
    return list(seen)
