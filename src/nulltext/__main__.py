from nulltext.cli import main

main()
