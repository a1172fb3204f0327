"""Words of the synthetic ad world: per category, the nouns and qualifiers its ad titles are
made of, the topics of its short videos and news, and its advertisers' name stems. Data, not
code, so a category can be added without touching the generator."""

from __future__ import annotations

# category -> (ad product nouns, qualifiers, content topics, advertiser stems)
CATEGORIES: dict[str, tuple[list[str], list[str], list[str], list[str]]] = {
    "sports": (
        ["badminton racket", "running shoes", "yoga mat", "tennis balls", "gym gloves",
         "football boots", "cycling helmet", "jump rope", "dumbbell set", "sports bottle"],
        ["lightweight", "pro", "breathable", "grip", "training"],
        ["badminton", "marathon training", "football highlights", "yoga flow", "home workout",
         "tennis final", "cycling tour", "basketball dunk"],
        ["Peak", "Stride", "Victory", "Arena"],
    ),
    "gaming": (
        ["gaming mouse", "mechanical keyboard", "game controller", "gaming headset",
         "console bundle", "gaming chair", "graphics card", "mouse pad", "arcade stick", "game pass"],
        ["rgb", "wireless", "esports", "low latency", "ultimate"],
        ["speedrun", "esports final", "boss fight", "game review", "let's play", "patch notes",
         "strategy guide", "retro games"],
        ["PixelForge", "NeonPlay", "Quest", "Respawn"],
    ),
    "beauty": (
        ["lipstick", "face serum", "eye shadow palette", "moisturizer", "sunscreen",
         "hair dryer", "nail polish", "perfume", "face mask", "mascara"],
        ["hydrating", "matte", "organic", "long lasting", "vegan"],
        ["makeup tutorial", "skincare routine", "hair styling", "fragrance review",
         "nail art", "beauty haul", "glow up", "spa day"],
        ["Lumi", "Velvet", "Bloom", "Aura"],
    ),
    "travel": (
        ["flight deal", "hotel booking", "beach resort", "city break", "travel backpack",
         "cruise package", "ski trip", "rental car", "travel insurance", "suitcase"],
        ["all inclusive", "last minute", "family", "luxury", "budget"],
        ["island hopping", "city walk", "road trip", "mountain hike", "travel vlog",
         "hidden beaches", "airport tips", "street food tour"],
        ["SkyWay", "Wander", "Horizon", "Voyage"],
    ),
    "food": (
        ["pizza delivery", "coffee beans", "meal kit", "green tea", "chocolate box",
         "olive oil", "noodle pack", "burger combo", "fresh fruit box", "spice set"],
        ["organic", "spicy", "family size", "gourmet", "fresh"],
        ["recipe", "street food", "baking", "coffee art", "restaurant review", "cooking show",
         "noodle making", "food challenge"],
        ["Tasty", "Harvest", "Golden Spoon", "Urban Kitchen"],
    ),
    "finance": (
        ["credit card", "savings account", "stock trading app", "personal loan",
         "insurance plan", "mortgage", "crypto wallet", "retirement fund", "tax software",
         "budget planner"],
        ["zero fee", "cashback", "low rate", "smart", "premium"],
        ["stock market", "investing basics", "crypto news", "budget tips", "tax season",
         "interest rates", "real estate", "economy report"],
        ["Capital", "TrustBank", "Ledger", "Summit Finance"],
    ),
    "education": (
        ["online course", "language app", "coding bootcamp", "exam prep", "math tutor",
         "ebook reader", "certificate program", "kids learning tablet", "study planner",
         "music lessons"],
        ["certified", "interactive", "beginner", "advanced", "accelerated"],
        ["study with me", "language learning", "coding tutorial", "exam tips", "science explained",
         "history documentary", "math tricks", "university life"],
        ["LearnHub", "Brightmind", "Scholar", "Academia"],
    ),
    "automotive": (
        ["electric car", "car tyres", "dash cam", "car wax", "engine oil", "car seat cover",
         "suv lease", "motorbike helmet", "car charger", "roof rack"],
        ["all season", "hybrid", "turbo", "premium", "compact"],
        ["car review", "ev charging", "racing", "car detailing", "motorbike trip",
         "engine repair", "auto show", "off road"],
        ["Motorline", "Volt", "Torque", "Roadster"],
    ),
    "home": (
        ["sofa", "bed sheets", "robot vacuum", "dining table", "led lamp", "kitchen knife set",
         "storage box", "curtains", "air purifier", "coffee maker"],
        ["modern", "cozy", "smart", "minimalist", "durable"],
        ["home makeover", "interior design", "cleaning hacks", "diy furniture",
         "organizing tips", "small apartment", "garden design", "kitchen tour"],
        ["Nest", "Homely", "Casa", "Linen & Co"],
    ),
    "fashion": (
        ["denim jacket", "sneakers", "summer dress", "leather bag", "wool coat", "sunglasses",
         "silk scarf", "wrist watch", "hoodie", "ankle boots"],
        ["slim fit", "vintage", "oversized", "classic", "limited edition"],
        ["outfit ideas", "fashion week", "street style", "lookbook", "thrift haul",
         "sneaker unboxing", "wardrobe tips", "runway show"],
        ["Urban Thread", "Maison", "Stitch", "Vogue Lane"],
    ),
    "electronics": (
        ["smartphone", "laptop", "wireless earbuds", "smart watch", "tablet", "4k tv",
         "bluetooth speaker", "power bank", "camera", "router"],
        ["5g", "ultra thin", "noise cancelling", "fast charging", "pro"],
        ["phone unboxing", "tech review", "gadget news", "camera test", "laptop comparison",
         "smart home setup", "ai news", "product launch"],
        ["Voltix", "Nova", "Circuit", "Apex Tech"],
    ),
    "health": (
        ["vitamin pack", "protein powder", "fitness tracker", "massage gun", "sleep aid",
         "blood pressure monitor", "herbal tea", "first aid kit", "posture corrector",
         "meditation app"],
        ["natural", "clinically tested", "sugar free", "daily", "premium"],
        ["healthy habits", "meditation", "nutrition facts", "sleep science", "doctor explains",
         "mental health", "stretching routine", "healthy recipes"],
        ["Vital", "PureLife", "Wellness Co", "Remedy"],
    ),
    "parenting": (
        ["baby stroller", "diapers", "baby formula", "kids toys", "car seat", "baby monitor",
         "kids backpack", "crib", "baby bottles", "building blocks"],
        ["safe", "soft", "eco", "educational", "newborn"],
        ["parenting tips", "baby's first steps", "family vlog", "kids crafts",
         "bedtime stories", "school prep", "toddler activities", "pregnancy diary"],
        ["Little Ones", "Cradle", "Tiny Steps", "KidJoy"],
    ),
    "pets": (
        ["dog food", "cat litter", "pet bed", "dog leash", "cat tree", "aquarium",
         "pet shampoo", "chew toys", "bird cage", "pet carrier"],
        ["grain free", "durable", "natural", "cozy", "premium"],
        ["funny cats", "dog training", "puppy care", "pet rescue", "aquarium setup",
         "cat grooming", "dog tricks", "pet vlog"],
        ["Paws", "Whisker", "FurryFriends", "Petopia"],
    ),
    "music": (
        ["guitar", "concert tickets", "music streaming", "headphones", "digital piano",
         "microphone", "vinyl player", "drum kit", "ukulele", "studio monitor"],
        ["acoustic", "live", "hifi", "beginner", "studio"],
        ["guitar cover", "live concert", "music video", "album review", "piano tutorial",
         "drum solo", "festival highlights", "songwriting"],
        ["Melody", "Soundwave", "Encore", "Harmonix"],
    ),
    "real_estate": (
        ["apartment for sale", "home loan", "office rental", "villa", "studio flat",
         "property valuation", "new development", "land plot", "moving service",
         "home inspection"],
        ["city center", "sea view", "affordable", "new", "spacious"],
        ["house tour", "property market", "renovation", "first home", "apartment hunting",
         "mortgage tips", "architecture", "moving day"],
        ["Keystone", "Urban Estates", "Landmark", "Dwell"],
    ),
}

AD_TITLE_TEMPLATES = [
    "{advertiser} {qualifier} {noun}",
    "{qualifier} {noun} by {advertiser}",
    "{noun} - {qualifier} edition",
]
AD_DESCRIPTION_TEMPLATES = [
    "Discover the {qualifier} {noun} from {advertiser}, loved by fans of {topic}.",
    "{advertiser} brings a {qualifier} {noun}. Perfect if you enjoy {topic}.",
    "Shop the {noun}: {qualifier}, great value, made for {topic} lovers.",
]
CONTENT_TITLE_TEMPLATES = {
    "video": ["{topic}", "{topic} highlights", "best {topic} moments", "{topic} in 60 seconds"],
    "news": ["{topic}: what you need to know", "latest on {topic}", "{topic} report",
             "why {topic} matters"],
}

GENDERS = ["female", "male"]
CITIES = ["Shenzhen", "Beijing", "Shanghai", "Chengdu", "Guangzhou", "Hangzhou", "Wuhan", "Xi'an"]
EDUCATIONS = ["high school", "bachelor", "master", "doctorate"]
INDUSTRIES = ["IT", "finance", "education", "healthcare", "manufacturing", "retail",
              "student", "government"]
AGE_BUCKETS = [(18, 24), (25, 34), (35, 44), (45, 59), (60, 75)]
