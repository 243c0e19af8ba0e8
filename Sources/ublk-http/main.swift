import UblkCLI

UblkHTTP.main()
