import sys

from engine.tools.bench import main

sys.exit(main())
