"""Wire compressions of tensors, by jaxseq's name: the one table of them (``ClientConfig.compression``
is checked against it without importing hivemind; ``protocol`` maps the names to hivemind's codes).

Example:
    >>> sorted(COMPRESSIONS)
    ['float16', 'meanstd16', 'none', 'quantile8bit', 'uniform8bit']
"""

# jaxseq's name -> the name of hivemind's ``runtime_pb2.CompressionType``
COMPRESSIONS = {
    "none": "NONE",
    "float16": "FLOAT16",
    "meanstd16": "MEANSTD_16BIT",
    "uniform8bit": "UNIFORM_8BIT",
    "quantile8bit": "QUANTILE_8BIT",
}
