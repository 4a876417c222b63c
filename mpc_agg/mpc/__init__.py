"""MPyC glue: topology -> MPyC options (``argv``), the one module importing ``mpyc``
(``runtime``), and the protocol steps run over the party network (``reveal``)."""
