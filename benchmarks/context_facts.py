"""A long synthetic chat with planted facts and later questions about them.

    .venv/bin/python benchmarks/context_facts.py

The data behind a benchmark of context strategies: which earlier turns of a long chat a
strategy keeps when the chat must fit a small token budget. ``conversation()`` builds,
deterministically from a seed, an OpenAI-style message list (a system message, then
alternating user/assistant turns) of varied filler talk (cooking, travel, code review,
weather, sports, a house move, a garden, books...) in which some user turns state a
specific personal fact (a wifi password, a locker code, a pet's name, a flight number...).
Each fact is asked about much later, either with the fact's own key words or as a
paraphrase that shares few of them. Distractor turns mention the same kind of thing in
another context or with another value, so a retriever must discriminate.

Each question's answer appears verbatim in its evidence message and in no other message:
a strategy "remembers" a fact when the evidence message survives the fit.
"""

from __future__ import annotations

import random
import re
import string
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Conversation", "Question", "conversation"]


@dataclass(frozen=True)
class Question:
    position: int  # index into messages: the question is asked right after messages[:position]
    text: str  # the user's question
    answer: str  # a short string that appears verbatim in the evidence message
    evidence: int  # index in messages of the user message that planted the fact


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, str]]
    questions: list[Question]


SYSTEM = "You are a friendly, helpful personal assistant. Keep replies short and practical."
MIN_GAP_TURNS = 30  # a question comes at least this many turns (60 messages) after its fact

# ---------------------------------------------------------------------------------------
# Filler: topics of (user template, reply templates), filled from SLOTS.
# ---------------------------------------------------------------------------------------

# "ingredient2" is a stand-in for "ingredient" in the same message.
SUBSTITUTES = {"fresh basil": "dried oregano", "coconut milk": "single cream", "smoked paprika": "chilli flakes",
               "feta": "halloumi", "chickpeas": "red lentils", "spinach": "kale", "cumin": "ground coriander",
               "ginger": "extra garlic", "parmesan": "pecorino", "soy sauce": "tamari", "leeks": "onions",
               "butter beans": "cannellini beans"}
SLOTS: dict[str, list[str]] = {
    "person": ["Priya", "Marco", "Jonas", "Aisha", "Tom", "Grace", "Felix", "Hannah", "Diego", "Chloe", "Omar",
               "Ruth", "Kenji", "Maya"],
    "friend": ["my sister", "my dad", "a colleague", "my neighbour", "my partner", "my best friend"],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "dish": ["risotto", "pad thai", "lasagne", "chilli", "a green curry", "paella", "ramen", "tacos", "a frittata",
             "minestrone", "shepherd's pie", "falafel wraps"],
    "ingredient": list(SUBSTITUTES),
    "count": ["four", "six", "eight", "ten", "twelve"],
    "count_big": ["forty", "sixty", "two hundred", "three hundred", "a hundred and fifty"],
    "minutes": ["twenty", "thirty", "fifteen", "twenty-five"],
    "city": ["Lyon", "Porto", "Copenhagen", "Vienna", "Seville", "Krakow", "Bologna", "Ghent", "Tallinn", "Valencia",
             "Bruges", "Ljubljana"],
    "weather": ["drizzly", "freezing", "humid", "windy", "scorching", "foggy", "grey and damp", "stormy"],
    "team": ["United", "the Rovers", "City", "the Hawks", "Athletic", "the Wanderers", "the Tigers"],
    "sport": ["five-a-side", "tennis", "badminton", "cycling", "netball", "squash", "volleyball"],
    "score": ["2-1", "3-3", "1-0", "4-2", "0-0", "2-2", "3-1"],
    "book": ["Middlemarch", "The Remains of the Day", "Station Eleven", "Piranesi", "Rebecca", "The Secret History",
             "Pachinko", "Klara and the Sun"],
    "genre": ["thriller", "memoir", "fantasy novel", "historical novel", "short story collection", "sci-fi novel"],
    "plant": ["tomatoes", "courgettes", "sweet peas", "runner beans", "lavender", "strawberries", "dahlias",
              "sunflowers"],
    "pest": ["slugs", "aphids", "snails", "pigeons", "blackfly", "caterpillars"],
    "language": ["Python", "TypeScript", "Go", "Rust", "Java", "Kotlin"],
    "pr_thing": ["the caching layer", "the retry logic", "the login flow", "the CSV export", "the search endpoint",
                 "the payment webhook", "the config loader", "the image resizer"],
    "bug": ["a race condition", "an off-by-one error", "a memory leak", "a timezone bug", "a null pointer",
            "a flaky test", "a deadlock"],
    "room": ["kitchen", "spare room", "loft", "garage", "hallway cupboard", "bathroom"],
    "furniture": ["the wardrobe", "the piano", "the bookshelves", "the sofa", "the bed frame",
                  "the washing machine"],
    "artist": ["Radiohead", "Nina Simone", "Fleetwood Mac", "Khruangbin", "Bon Iver", "Miles Davis", "Bjork",
               "Arctic Monkeys"],
    "show": ["the new detective series", "that baking competition", "a nature documentary",
             "the sci-fi show everyone talks about", "a Danish crime drama", "a period drama"],
    "exercise": ["a 5k run", "a spin class", "an hour of yoga", "a long swim", "a hill walk", "leg day at the gym"],
    "weeks": ["eight", "ten", "twelve", "sixteen"],
    "expense": ["The car insurance", "The council tax", "Our phone bill", "The energy bill",
                "The streaming subscriptions", "The broadband contract"],
    "amount": ["forty", "sixty", "a hundred and twenty", "eighty-five", "two hundred"],
    "subject": ["maths", "spelling", "science", "history", "French"],
    "car_issue": ["a rattling noise", "a warning light on the dashboard", "a squeaky belt", "a slow puncture",
                  "a sticky gearbox"],
    "meeting": ["The quarterly planning", "The sprint review", "The budget meeting", "The all-hands",
                "A client call"],
    "hours": ["two", "three", "four"],
    "symptom": ["a sore throat", "a stiff back", "a headache", "a cough that won't go away", "trouble sleeping"],
    "gadget": ["The printer", "My phone", "The router", "The smart speaker", "My laptop", "The TV"],
}

TOPICS: dict[str, list[tuple[str, list[str]]]] = {
    "cooking": [
        ("I'm making {dish} tonight but I'm out of {ingredient}. Would {ingredient2} work instead, or should I run to "
         "the shop before {person} gets home?",
         ["{ingredient2} should work fine if you add it a little later and taste as you go. Keep the heat moderate "
          "so nothing catches.",
          "It won't be identical, but {ingredient2} is a reasonable swap. Go easy at first and adjust the seasoning "
          "at the end."]),
        ("Made {dish} for {count} people last night and it went down well, though the {ingredient} was a bit "
         "overpowering. Any tips for balancing it next time?",
         ["A squeeze of lemon or a splash of vinegar usually tames a strong flavour. Next time start with half the "
          "{ingredient} and build up.",
          "Sounds like a success overall! Add the {ingredient} in stages and taste between additions."]),
        ("What's a quick weeknight dinner I can make in under {minutes} minutes? I've got {ingredient}, some rice, "
         "an onion and not much energy left.",
         ["A simple stir-fry would do it: soften the onion, add the {ingredient}, season well and serve over rice.",
          "Try a one-pan rice dish with the onion and {ingredient}. It's quick, and there's only one pan to wash."]),
        ("{person} keeps asking me to cook {dish} again. I never wrote the recipe down, I just remember it had "
         "{ingredient} and a lot of garlic.",
         ["Write down what you remember while it's fresh, then adjust as you cook it again. Recipes rarely need "
          "to be exact.",
          "Start from a standard {dish} recipe and add the {ingredient} and garlic the way you remember."]),
        ("Is it worth buying a cast iron pan? My non-stick one is peeling and I mostly cook {dish} and eggs.",
         ["A cast iron pan lasts for decades if you keep it dry and oiled. It's great for searing, though eggs "
          "take a little practice."]),
    ],
    "travel": [
        ("We're thinking about a long weekend in {city} in the spring. Is it better to fly or take the train, and "
         "how many days do we need to see the main sights?",
         ["Three days in {city} covers the highlights without rushing. The train is often more relaxing if the "
          "journey is under six hours.",
          "It depends on your connections. Flights look quicker, but once you add airport time the train can be "
          "competitive."]),
        ("Our flight back from {city} was delayed by {hours} hours and nobody told us anything until the last "
         "minute. Is it worth claiming compensation?",
         ["It's usually worth checking. For long delays on many routes you may be entitled to compensation, so "
          "keep your boarding passes and receipts.",
          "Yes, file a claim with the airline first. Note the actual arrival time while you still remember it."]),
        ("Packing for {city} and I can never decide what to bring. The forecast says it'll be {weather} most of the "
         "week. How do I avoid overpacking this time?",
         ["Plan outfits around layers and stick to two or three colours so everything mixes. One good jacket beats "
          "three jumpers.",
          "Lay out everything you want to take, then put a third of it back. You'll rarely miss it."]),
        ("{person} just got back from {city} and can't stop talking about the food markets. Do you know what the "
         "local specialities are there?",
         ["Markets are the best way in. Ask stallholders what they'd eat themselves and go early, before the "
          "crowds arrive."]),
        ("Is travel insurance worth it for a short trip to {city}? The airline keeps offering it at checkout and "
         "I never know if it's a rip-off.",
         ["The airline's add-on is often poor value. An annual policy bought separately usually covers more for "
          "less if you travel more than once a year."]),
    ],
    "code_review": [
        ("Can you look at my {language} PR? It refactors {pr_thing}, but a reviewer says it introduces {bug}. I "
         "can't reproduce it locally at all.",
         ["Intermittent issues like {bug} often only show up under load or in CI. Add logging around {pr_thing} "
          "and run the tests in a loop.",
          "I'd start by writing a test that reproduces the reviewer's scenario. Once it fails reliably, the fix "
          "is usually small."]),
        ("The team wants every password in the test fixtures replaced with environment variables before the "
         "release. Is that overkill for an internal {language} service?",
         ["It's not overkill. Secrets in fixtures tend to leak into logs and forks, so environment variables are "
          "cheap insurance."]),
        ("I spent {hours} hours tracking down {bug} in {pr_thing} today. Turns out it was one missing line. How do "
         "you stop this from happening again?",
         ["A regression test for that exact case is the best defence. A short comment explaining why the line "
          "matters helps too.",
          "Painful, but common. Pin it down with a test and mention it in the PR description so others learn "
          "from it."]),
        ("Should code reviews block on style nitpicks? {person} leaves twenty comments about naming on every pull "
         "request and it's slowing the whole team down.",
         ["Automate the style rules with a formatter and a linter, then agree that reviews focus on behaviour and "
          "design."]),
        ("Our {language} build takes almost twenty minutes in CI now. Where would you look first to speed it up?",
         ["Look at caching dependencies between runs and splitting the slowest tests into parallel jobs. Profiling "
          "one run usually shows a clear culprit."]),
    ],
    "weather": [
        ("It's been {weather} all week here and the forecast says more of the same until {day}. I'm starting to "
         "forget what the sun looks like.",
         ["That kind of stretch really wears people down. A bright lamp in the morning and a walk at lunch can "
          "help more than you'd expect."]),
        ("Do you think it's safe to hang the washing out today? The sky looks {weather} but the app says only a "
         "ten percent chance of rain.",
         ["Ten percent is low, so I'd risk it, but keep an eye on the sky after lunch and bring things in by late "
          "afternoon."]),
        ("There's a storm warning for {day} night. Anything I should do around the house to get ready, apart from "
         "bringing the garden chairs in?",
         ["Secure anything loose outside, clear the gutters if you can, and charge your phone and a torch.",
          "Tie down or bring in anything that could blow around, and check the bins are tucked away."]),
        ("The weather at the weekend was perfect, we sat outside with {person} until it got dark. Funny how one "
         "sunny day changes everyone's mood.",
         ["It really does. Long evenings outside with friends are one of the best parts of the year."]),
    ],
    "sports": [
        ("Did you see {team} last night? {score} in the end, and the referee missed a blatant handball. I'm still "
         "annoyed about it this morning.",
         ["A {score} result with a missed call like that would frustrate anyone. These things tend to even out "
          "over a season, though it rarely feels like it."]),
        ("I've started playing {sport} on {day} evenings with people from work. My legs are aching, but it's a "
         "great way to switch off after the office.",
         ["That's a great habit. Stretch properly afterwards and the aches should ease within a couple of weeks."]),
        ("{person} wants me to join the {sport} league this season, but I'm worried I'm not good enough and I'll "
         "let the team down.",
         ["Most social leagues are more about turning up than being brilliant. People are usually just happy to "
          "have the numbers."]),
        ("The {team} match on {day} clashes with my friend's birthday dinner. Is it rude to check the score under "
         "the table?",
         ["A quick glance is probably fine, but keep the phone away while people are talking. The highlights will "
          "still be there later."]),
    ],
    "house_move": [
        ("We're moving next month and I still haven't started packing the {room}. How far in advance should we "
         "start, realistically?",
         ["Start with the rooms you use least, like the {room}, about three weeks out. Label every box with its "
          "room and a short list of contents."]),
        ("The movers say {furniture} won't fit through the new front door. Do we take it apart, sell it, or just "
         "hope they're wrong?",
         ["Measure the door and the widest part yourself first. If it's close, taking it apart is usually cheaper "
          "than replacing it."]),
        ("I've got a list of people to tell about the new address: the bank, the dentist, work. What am I "
         "forgetting?",
         ["Don't forget the electoral roll, car registration, insurance, subscriptions and online shops. A post "
          "redirect for a few months helps too."]),
        ("Found a box from our last move that we never even opened. Apparently we've lived without its contents "
         "for three years. Should I just donate it?",
         ["If you didn't miss anything in three years, donating it makes sense. Check quickly for documents or "
          "photos first."]),
        ("The new house needs painting before we move in. Is it better to do the {room} ourselves over a weekend "
         "or pay a decorator?",
         ["A single room is very doable over a weekend if you prep the walls properly. For ceilings and "
          "stairwells a decorator often earns their fee."]),
    ],
    "garden": [
        ("The {plant} are finally coming up, but the {pest} got to half of them overnight. Is there anything that "
         "works without harsh chemicals?",
         ["Barriers, traps and hand-picking at dusk all help with {pest}. A few sacrificial seedlings nearby can "
          "also draw them away."]),
        ("I want to grow {plant} this year. Should I start them indoors on the windowsill or sow them straight "
         "into the beds?",
         ["Starting {plant} indoors gives them a head start. Harden them off for a week before planting out once "
          "the frosts are over."]),
        ("The lawn is more moss than grass at this point. {person} says scarify it, my dad says lime it. Who's "
         "right?",
         ["Both can help, but moss usually signals shade, poor drainage or compaction. Fix the cause, then "
          "scarify and overseed in early autumn."]),
        ("Spent the whole of {day} weeding and my back is wrecked, but the garden looks amazing. Is there a way to "
         "make it less work next year?",
         ["Mulching the beds thickly in spring smothers most weeds. Ground-cover plants fill the gaps so there's "
          "less bare soil."]),
    ],
    "books": [
        ("I just finished {book} and I can't stop thinking about the ending. Can you suggest something similar for "
         "the holiday?",
         ["If {book} stayed with you, look for something with a similar quiet, reflective tone. A good {genre} "
          "could be a nice change of pace too."]),
        ("I keep buying books and not reading them. My pile has about {count_big} unread now. How do people "
         "actually make time to read?",
         ["Small, regular slots work best: twenty minutes before bed or on the commute. Keep one book by the bed "
          "and one in your bag."]),
        ("{person} lent me a {genre} and I'm struggling with it, but it's the third one they've lent me and I don't "
         "want to offend them again.",
         ["You can be honest without being harsh. Mention what you did enjoy and say it isn't really your kind of "
          "book."]),
        ("Is it worth getting an e-reader, or should I stick with paper books? I mostly read on the train and in "
         "bed.",
         ["An e-reader is great for travel and reading in the dark, and it's lighter in your bag. Plenty of people "
          "keep paper books for home."]),
    ],
    "music": [
        ("Got tickets to see {artist} in {city} next month! First concert in years. Any tips for not being "
         "miserable in a huge crowd?",
         ["Get there early for a spot near the sound desk, wear comfortable shoes and bring earplugs. Eat "
          "beforehand, venue food is rarely good."]),
        ("I've been listening to {artist} on repeat all week. Who else would I like if I enjoy that kind of sound?",
         ["It depends which side of {artist} you like most, but exploring their influences is a good start."]),
        ("Thinking about picking the guitar back up after ten years. Is it realistic to learn properly as an adult "
         "with a full-time job?",
         ["Absolutely. Fifteen minutes a day beats one long session a week, and muscle memory comes back faster "
          "than you expect."]),
        ("{person} keeps playing the same three songs in the car. How do I gently suggest we listen to something "
         "else on the long drive?",
         ["Suggest a shared playlist where you each add a few songs. It feels like a game rather than a "
          "complaint."]),
    ],
    "fitness": [
        ("Did {exercise} this morning and felt great afterwards. How often should I do this if I want to build "
         "stamina without burning out?",
         ["Three times a week with rest days in between is a solid start. Increase the effort gradually, about "
          "ten percent a week."]),
        ("My knees ache after running on pavement. Should I switch to trails, buy new shoes, or just accept it at "
         "my age?",
         ["New shoes and softer surfaces both help, and strength work for your legs makes a real difference. If "
          "it persists, see a physio."]),
        ("Skipped the gym all week because of work. Is it better to do one huge session on {day} or just start "
         "fresh next week?",
         ["Don't try to make up for it in one big session. A normal, moderate workout on {day} gets you back into "
          "the routine."]),
        ("{person} and I signed up for a charity 10k in the autumn. We have about {weeks} weeks. Is that enough to "
         "train from nothing?",
         ["{weeks} weeks is usually enough for a 10k if you build gradually. Start with run-walk intervals and add "
          "a little distance every week."]),
    ],
    "work": [
        ("{meeting} ran {hours} hours over today and we didn't decide anything. How do I politely suggest an "
         "agenda next time?",
         ["Offer to draft the agenda yourself and share it the day before. People rarely object when someone else "
          "does the organising."]),
        ("I have to present the results to the whole department on {day}. I always get nervous and talk too fast. "
         "Any tricks?",
         ["Rehearse out loud at least twice and mark places in your notes to pause. Slow breathing before you "
          "start helps more than people think."]),
        ("{person} keeps scheduling meetings at lunchtime. It's the only hour I get to myself. Is it okay to "
         "decline?",
         ["It's reasonable to decline or suggest another time. Blocking lunch in your calendar makes it clear "
          "without a confrontation."]),
        ("My inbox has over {count_big} unread emails after the holiday. Where do I even start?",
         ["Deal with your manager and direct team first, then archive newsletters in bulk. Anything urgent will "
          "have been chased already."]),
    ],
    "money": [
        ("{expense} went up by {amount} pounds this year. Is it worth spending an afternoon shopping around, or do "
         "they all charge the same?",
         ["It's usually worth it. Comparison sites make it quick, and calling to say you're leaving often gets a "
          "better offer."]),
        ("We're trying to save for a holiday. What's a realistic way to set aside money each month without "
         "feeling miserable?",
         ["Automate a transfer on payday into a separate pot so you never see it. Even a small amount adds up "
          "faster than you'd think."]),
        ("{person} owes me {amount} pounds from the trip and hasn't mentioned it. How do I bring it up without "
         "making things awkward?",
         ["Keep it light and specific: send the amount and a quick note asking them to settle up when they can. "
          "Most people just forget."]),
        ("Should I pay off my credit card or put the money into savings? The interest rates all feel confusing.",
         ["If the card's interest is higher than what savings earn, paying off the card usually wins. Keep a small "
          "emergency cushion first."]),
    ],
    "screen": [
        ("We started {show} last night and stayed up way too late. Is it worth sticking with if the first episode "
         "was a bit slow?",
         ["Most series need two or three episodes to find their feet. If you liked the characters, give it until "
          "the third one."]),
        ("{person} recommended an old film noir for movie night. Would the kids find it boring, or is it worth a "
         "try?",
         ["Older films can feel slow for kids, but a short one with a clear mystery can work. Pause now and then "
          "to ask who they suspect."]),
        ("Which streaming subscriptions are actually worth keeping? We pay for four and watch maybe one of them.",
         ["Keep the one you use and rotate the others month by month. Cancelling and resubscribing is easy and "
          "saves a surprising amount."]),
        ("Finished {show} and the finale was a letdown after such a strong build-up. Why do so many shows stumble "
         "at the end?",
         ["Endings are hard because expectations keep growing. Writers often have to close too many threads in "
          "too little time."]),
    ],
    "kids": [
        ("Our eldest is struggling with {subject} homework and I can't remember any of it myself. How do I help "
         "without just giving the answers?",
         ["Ask them to explain what they've tried so far; talking it through often unlocks it. Short videos on "
          "{subject} can refresh your memory too."]),
        ("The school wants parents to volunteer for the summer fair on {day}. I'm swamped at work. Is it terrible "
         "to say no this year?",
         ["Not at all. You could offer to bake something or help for an hour instead, which schools usually "
          "appreciate."]),
        ("The kids have a week off and I have to work. Any ideas for keeping them busy that don't involve screens "
         "all day?",
         ["Mix a few structured things, like a library trip or a holiday club, with open-ended projects such as "
          "building a den."]),
        ("{person}'s mum invited our youngest to a sleepover on {day}. It's the first one. Should I be nervous?",
         ["A little nervousness is normal. Make sure you have the other parent's number and tell your child they "
          "can call if they want to come home."]),
    ],
    "car": [
        ("The car has had {car_issue} since the cold snap. Is it something I can check myself, or straight to a "
         "garage?",
         ["Tyre pressures and fluid levels you can check yourself. For {car_issue}, a quick garage diagnosis is "
          "probably worth it."]),
        ("The car's service is due on {day} and it's filthy inside. Does it actually matter if it's clean when I "
         "take it in?",
         ["A dirty car won't cause problems, but clear the boot and make sure the lights and windscreen are clean "
          "enough to check."]),
        ("Thinking about switching to an electric car. Is charging a hassle if we don't have a driveway?",
         ["Without a driveway you'd rely on public chargers, which varies a lot by area. Check what's near you "
          "before committing."]),
        ("Someone dinged my door in the supermarket car park and drove off. Is it worth going through insurance "
         "for a small dent?",
         ["For a small dent, a mobile repairer is often cheaper than your excess, and a claim may raise your "
          "premium."]),
    ],
    "pets": [
        ("Our old dog barks at the postman every single morning. Is there a way to train that out of him at his "
         "age?",
         ["Older dogs can learn. Reward calm behaviour when the post arrives and give him a job, like going to his "
          "bed."]),
        ("How often should a cat go to the vet if she seems perfectly healthy? Ours hasn't been in two years.",
         ["A yearly check-up is a good rule even if she seems fine. Cats hide problems well, and vaccinations need "
          "boosters."]),
        ("{person} is thinking about getting a dog but works long hours. What would you tell them?",
         ["Be honest about the time. A dog walker helps, but an older, calmer rescue might suit long days better "
          "than a puppy."]),
        ("The dog ate half a sock yesterday and seems completely fine. Should I be worried?",
         ["Watch for vomiting, lethargy or not eating. If any of that appears, call the vet straight away."]),
    ],
    "health": [
        ("I've had {symptom} for about a week. Is it worth booking an appointment, or should I give it a few more "
         "days?",
         ["If it's getting worse or affects daily life, book the appointment. Otherwise rest, fluids and a few "
          "more days is reasonable."]),
        ("Trying to drink more water and less coffee. I'm on four cups a day. How do I cut down without the "
         "headaches?",
         ["Cut down slowly, about one cup every few days, and replace it with water or herbal tea. The headaches "
          "usually fade within a week."]),
        ("My sleep has been terrible since the clocks changed. Any tips that actually work?",
         ["Keep the same wake-up time every day, get daylight in the morning and avoid screens for the last hour "
          "before bed."]),
        ("The pharmacy ran out of my usual hay fever tablets. Are the generic ones basically the same?",
         ["Generic versions contain the same active ingredient at the same dose, so they should work the same. "
          "The pharmacist can confirm."]),
    ],
    "tech": [
        ("{gadget} stopped working again this morning. I turned it off and on, which usually fixes it. What should "
         "I try next?",
         ["Check for updates and make sure the cables are seated properly. If it keeps happening, a factory reset "
          "is the next step."]),
        ("I keep getting emails saying my password expired and asking me to log in through a link. That's a scam, "
         "right?",
         ["It almost certainly is. Don't click the link; go to the website directly and report the email as "
          "phishing."]),
        ("My phone storage is full again. What's the quickest way to free up space without deleting all my "
         "photos?",
         ["Back up the photos to the cloud or a computer, then clear downloads and app caches. Old voice notes "
          "take more space than you'd think."]),
        ("The home wifi drops every evening around eight. Could the neighbours be slowing it down?",
         ["Crowded channels can do that in the evening. Try switching the router to another channel or to the "
          "5 GHz band."]),
    ],
}

USER_OPENERS = ["", "", "", "", "Quick question. ", "Okay, different topic. ", "Another thing. ", "Hey! ",
                "Random thought. ", "This has been bugging me. "]
USER_CLOSERS = ["", "", " Thanks in advance.", " Sorry, long week.", " Curious what you think.", " No rush on this.",
                " I've been going back and forth on it for days.", " According to {friend}, I'm overthinking it.",
                " It's been on my mind since the weekend.", " Honest opinions welcome, even if it's not what I want "
                "to hear.", " I'd rather sort it out before {day} if I can.", " Anyway, that's my morning so far.",
                " I asked {friend} too but got a very vague answer."]
REPLY_CLOSERS = ["", " Hope that helps!", " Let me know how it goes.", " Good luck with it.",
                 " Let me know if you want more ideas.",
                 " It's a common situation, so you're definitely not alone in this.",
                 " Happy to go through the details with you if that's useful.",
                 " Happy to help further if you need it."]

REPLY_OPENERS = ["", "", "", "", "Good question. ", "Fair enough. ", "Sure. ", "Okay. "]

# Replies to distractor turns: they answer chit-chat without echoing any value.
DISTRACTOR_REPLIES = [
    "Ugh, that sounds annoying. Hopefully it sorts itself out soon.",
    "Ha, that's quite a story. Things like that always seem to come in batches.",
    "That's fair. It's probably worth keeping an eye on it.",
    "Oh no. Let me know if I can help you plan around it.",
    "That sounds like a lot to deal with on top of everything else this week.",
    "Good to know. Let me know if you want help sorting anything out.",
    "Sounds about right, honestly. These things always seem to happen at the worst possible time.",
    "Interesting! Keep me posted on how it turns out.",
]

FACT_OPENERS = ["", "", "Quick note so I don't forget. ", "Something to remember for later. ",
                "Oh, one more thing. ", "Can you keep track of this for me? "]
ACKS = [
    "Noted, I'll keep the {label} in mind.",
    "Got it, I've made a note of the {label}.",
    "Thanks, that's saved. Tell me if the {label} ever changes.",
    "Understood. I'll remember the {label} for when you need it.",
    "Okay, the {label} is noted. Just ask whenever you need it.",
    "Good idea to write that down. I'll hold on to the {label}.",
    "All right, I've got the {label} stored for later.",
    "Thanks for telling me. The {label} is safely noted.",
]

# ---------------------------------------------------------------------------------------
# Facts: each kind of fact with its answer generator, statement, questions and distractors.
# ---------------------------------------------------------------------------------------

ADJECTIVES = ["blue", "amber", "quiet", "silver", "rusty", "lucky", "misty", "crimson", "golden", "velvet", "hollow",
              "brisk", "sleepy", "frosty", "mossy", "cobalt"]
NOUNS = ["heron", "otter", "maple", "comet", "falcon", "willow", "pebble", "lantern", "badger", "cedar", "harbor",
         "thistle", "marmot", "puffin", "sparrow", "walrus"]
FIRST_NAMES = ["Lena", "Tobias", "Ingrid", "Marisol", "Dario", "Keziah", "Anouk", "Bastian", "Oriane", "Yusuf",
               "Niamh", "Caspian", "Rosalind", "Teodor", "Elif", "Magnus", "Saoirse", "Florian", "Zofia", "Emeka",
               "Linnea", "Henrike", "Casimir", "Leopold", "Aurelie", "Thaddeus", "Ottilie", "Soren", "Beatrix",
               "Cosima", "Lorcan", "Imogen", "Ambrose", "Philippa", "Radomir", "Tancredi", "Maelle", "Gwendolyn"]
SURNAMES = ["Okonkwo", "Varga", "Lindqvist", "Brannigan", "Achterberg", "Moreau", "Kowalczyk", "Haddad",
            "Fairweather", "Nakashima", "Delacroix", "Oyelaran", "Petrakis", "Szabo", "Quintero", "Halloran"]
PET_NAMES = ["Biscuit", "Juniper", "Mochi", "Waffles", "Noodle", "Pickles", "Ziggy", "Clementine", "Marmalade",
             "Bramble", "Tofu", "Pretzel", "Nutmeg", "Sprocket", "Dumpling", "Fennel", "Gizmo", "Rascal", "Truffle",
             "Custard"]
ALLERGENS = ["sesame", "shellfish", "kiwi fruit", "penicillin", "hazelnuts", "celeriac", "mustard seed",
             "buckwheat", "lupin flour", "latex", "mango", "sulphites"]
HEIRLOOM_DISHES = ["mushroom stroganoff", "lamb tagine", "beef rendang", "chicken paprikash", "spanakopita",
                   "pierogi with fried onions", "sauerbraten", "coq au vin", "moussaka", "jollof rice", "bigos",
                   "cullen skink"]
BANKS = ["Harbourline Bank", "Northgate Credit Union", "Kestrel Savings", "Meridian Mutual", "Oakridge Bank",
         "Bluewater Building Society", "Lowland Trust", "Summit Federal"]
RESTAURANTS = ["Casa Lumen", "The Copper Kettle", "Osteria Fiora", "The Gilded Fig", "Maison Verte",
               "Saltbox Kitchen", "Lantern & Vine", "The Brass Anchor"]
BLOOD_TYPES = ["A positive", "A negative", "B positive", "B negative", "O positive", "O negative", "AB positive",
               "AB negative"]
NOVELS = ["The Salt Orchard", "A Map of Quiet Rivers", "The Glass Cartographer", "Winter at Hollow Fen",
          "The Last Lamplighter", "Letters from the Tideline", "The Orchard Keeper's Daughter", "Small Hours in Oslo"]
SONGS = ["Paper Lanterns", "Harbour Lights", "Slow Dance in the Rain", "Northern Summer", "Velvet Morning",
         "Two Cups of Coffee", "Under the Linden Tree", "Keep the Porch Light On"]
HIDING_SPOTS = ["ceramic frog", "loose brick by the shed", "third flowerpot on the left", "stone hedgehog",
                "upturned watering can", "birdbath base"]
ROSES = ["Golden Celebration", "Lady of Shalott", "Munstead Wood", "Boscobel", "Desdemona", "Gertrude Jekyll",
         "Crown Princess Margareta"]
MOVERS = ["Swift Crate Movers", "Two Brothers Removals", "Bluebird Relocations", "Carry-On Haulage",
          "Greenleaf Moving Co."]
VETS = ["Paws & Whiskers", "Briarwood Vets", "Tailwind Animal Clinic", "Hearthside Veterinary",
        "Copperfield Pet Hospital"]
STREETS = ["Larkspur Lane", "Quarry Row", "Tanner's Close", "Wickham Road", "Elderberry Way", "Foundry Street",
           "Marigold Crescent", "Kiln Walk"]
WINES = ["Montevento Rosso", "Poggio Alto Riserva", "Val di Lume", "Casale Nero", "Terre di Sorra",
         "Colle Aureo Bianco"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
CAPS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # no I, O, Q: they read as digits
Gen = Callable[[random.Random], str]


def _pick(pool: list[str]) -> Gen:
    return lambda r: r.choice(pool)


def _digits(n: int) -> Gen:
    return lambda r: str(r.randint(1, 9)) + "".join(r.choice(string.digits) for _ in range(n - 1))


def _passphrase(r: random.Random) -> str:
    return f"{r.choice(ADJECTIVES)}-{r.choice(NOUNS)}-{r.randint(10, 99)}"


def _plate(r: random.Random) -> str:
    letters = "".join(r.choice(CAPS) for _ in range(5))
    return f"{letters[:2]}{r.randint(10, 79)} {letters[2:]}"


def _flight(r: random.Random) -> str:
    return f"{r.choice(['TP', 'BA', 'KL', 'IB', 'AF', 'LX', 'SK', 'EI'])} {r.randint(120, 2999)}"


def _day_time(r: random.Random) -> str:
    return f"{r.choice(WEEKDAYS)} {r.randint(8, 17):02d}:{r.choice(['05', '15', '20', '35', '40', '50'])}"


def _date(r: random.Random) -> str:
    return f"{r.randint(1, 28)} {r.choice(MONTHS)}"


def _ref(r: random.Random) -> str:
    return "".join(r.choice(CAPS + "23456789") for _ in range(6))


def _phone(r: random.Random) -> str:
    return f"07{r.randint(100, 999)} {r.randint(100000, 999999)}"


@dataclass(frozen=True)
class _Kind:
    label: str  # for the assistant's acknowledgement: never holds the answer
    gen: Gen  # the answer (and the distractors' own values)
    fact: str  # "{a}": the answer
    direct: str  # a question that reuses the fact's key words
    para: str  # a paraphrase sharing few words with the fact
    distractors: tuple[str, ...]  # same kind of thing, another context or value ("{d}")


KINDS: list[_Kind] = [
    _Kind("cabin wifi details", _passphrase,
          "Before I forget: the wifi password at our cabin by the lake is {a}. The router is behind the bookshelf if "
          "it ever needs a restart.",
          "What's the wifi password at the cabin?",
          "How do I get online when we're up at the lake house?",
          ("The office wifi is painfully slow today, every video call keeps freezing and I've restarted my laptop "
           "twice.",
           "The cafe by the station prints its wifi password on the receipt, today it was {d}, which made me laugh.",
           "My brother's cabin in the hills has no wifi at all, just one bar of signal if you stand on the porch.")),
    _Kind("climbing gym locker", _digits(4),
          "My locker at the climbing gym has the combination {a}. I always blank on it after a long bouldering "
          "session.",
          "What's the combination for my locker at the climbing gym?",
          "I'm in the changing room after a long evening on the walls and my mind is blank. Which digits open my "
          "stuff?",
          ("The lockers at the swimming pool still take a one-euro coin, so I keep one in my jacket.",
           "My bike lock code is {d}, not that anyone would steal that rusty thing.",
           "The climbing gym raised its monthly fee again, I'm thinking about switching to the one across town.")),
    _Kind("puppy's name", _pick(PET_NAMES),
          "We finally named the new puppy! She's a beagle mix with floppy ears and her name is {a}.",
          "What's the name of our new puppy?",
          "What did we end up calling the young hound we brought home?",
          ("The neighbours' dog {d} barked half the night again, I barely slept.",
           "A golden retriever at the park stole half my sandwich today, the owner was mortified.",
           "My aunt's beagle is getting old and can barely manage the stairs anymore.")),
    _Kind("cat's name", _pick(PET_NAMES),
          "The cat we adopted from the shelter is called {a}. She's grey with one white paw and already owns the "
          "sofa.",
          "What's the name of the cat we adopted from the shelter?",
          "What do we call the rescued kitty who has taken over the couch?",
          ("A stray cat keeps sitting on our car bonnet every morning, I think someone is feeding it.",
           "My colleague's cat {d} walked across the keyboard during her presentation, it was the highlight of the "
           "meeting.")),
    _Kind("Lisbon flight", _flight,
          "My flight to Lisbon on the 14th is {a}, leaving from terminal 2 at some horribly early hour.",
          "What's my flight number to Lisbon?",
          "Which plane am I catching for the Portugal trip?",
          ("My colleague's flight {d} to Berlin was cancelled, so she's stuck at the airport hotel tonight.",
           "Flights to the coast are ridiculously expensive this summer, we might take the train instead.")),
    _Kind("dentist appointment", _day_time,
          "My dentist appointment got moved to {a}, with Dr. Okafor at the surgery on Bell Street.",
          "When is my dentist appointment?",
          "When do I need to show up to get my teeth checked?",
          ("The vet appointment for the dog is sometime next week, I still need to call and confirm.",
           "My haircut is booked for {d}, assuming the salon doesn't double-book me again.",
           "I really should book a dentist check-up for the kids too, it's been over a year.")),
    _Kind("rental car details", _plate,
          "The rental car we picked up is a silver hatchback with the number plate {a}, parked on level three.",
          "What's the number plate of the rental car?",
          "What registration is on the vehicle we hired for the trip?",
          ("Someone in a white van with the plate {d} parked across our driveway again this morning.",
           "The rental company charged us for a scratch that was already there last time, so I photograph "
           "everything now.")),
    _Kind("allergy", _pick(ALLERGENS),
          "Important for the dinner party: my partner is seriously allergic to {a}, even small traces, so keep that "
          "in mind for any recipes.",
          "What is my partner allergic to?",
          "What must I keep off the menu when I'm cooking for my other half?",
          ("My coworker is allergic to {d}, so we skipped the bakery run this morning.",
           "Hay fever season is brutal this year, my eyes have been streaming all week.")),
    _Kind("family recipe", _pick(HEIRLOOM_DISHES),
          "My grandmother's favourite dish is {a}; she used to make it every Sunday and I'd love to learn it.",
          "What's my grandmother's favourite dish?",
          "What should I cook when Nana visits so she feels at home?",
          ("My uncle swears by {d} but honestly I've never liked it.",
           "Grandma called today, she's doing well and complained about the weather as usual.")),
    _Kind("savings account", _pick(BANKS),
          "We opened our joint savings account at {a}, the branch on Mill Street, so the house deposit goes there "
          "now.",
          "Which bank is our joint savings account with?",
          "Where did we put the shared rainy-day money we're building up for a home?",
          ("My old student loan was with {d}, thankfully that's finally paid off.",
           "The bank app logged me out three times today, their latest update broke something.")),
    _Kind("new doctor", _pick(SURNAMES),
          "I switched family doctors; the new GP is Dr. {a} at the Riverside practice, and she seems lovely.",
          "What's the name of my new family doctor?",
          "Who's the physician I see these days when I'm feeling unwell?",
          ("Dr. {d} from the hospital called about my dad's test results, all clear thankfully.",
           "The doctor's surgery phone line was busy for forty minutes this morning.")),
    _Kind("sister's birthday", _date,
          "My sister's birthday is {a}; I always forget until the last minute, so remind me to send a card.",
          "When is my sister's birthday?",
          "On what date should I post a card to my sibling every year?",
          ("My cousin's birthday was {d} and I completely missed it, I feel terrible.",
           "Birthday cards are so expensive now, I might just start making my own.")),
    _Kind("house alarm", _digits(6),
          "The alarm code for the new house is {a}; you have thirty seconds after opening the front door to type "
          "it in.",
          "What's the alarm code for the new house?",
          "The panel by the entrance is beeping at me, what do I punch in to make it stop?",
          ("The fire alarm at the office went off twice this morning and nobody knew why.",
           "Our old flat's door code was {d}, funny how I still remember it.")),
    _Kind("Kyoto booking", _ref,
          "Our hotel booking reference for Kyoto is {a}; it's the ryokan near the river with the hot spring.",
          "What's the hotel booking reference for Kyoto?",
          "What confirmation code do I give at the front desk when we check in in Japan?",
          ("The Osaka hotel still hasn't sent a confirmation, I might need to phone them.",
           "Booking reference {d} is the one for the airport shuttle, not the hotel.")),
    _Kind("mechanic's name", _pick(FIRST_NAMES),
          "The mechanic who sorted out the brakes on our car is called {a}, at the little garage behind the petrol "
          "station. Really honest, too.",
          "What's the name of the mechanic who fixed our brakes?",
          "Who's the trustworthy person who repaired the car when it wouldn't stop properly?",
          ("The garage on the high street quoted me a fortune for new brakes, so I walked out.",
           "My friend's mechanic {d} apparently does house calls, which sounds too good to be true.")),
    _Kind("plumber's number", _phone,
          "The plumber who fixed the boiler left his number, {a}, in case the pressure drops again.",
          "What's the plumber's phone number?",
          "Who do I ring if the heating loses pressure again?",
          ("The electrician's number is {d}, but he's booked up until next month.",
           "The boiler is making a strange knocking noise again, I hope it's nothing.")),
    _Kind("landlord's name", _pick(FIRST_NAMES),
          "Our landlord's name is {a}; they live upstairs and prefer texts to calls.",
          "What's our landlord's name?",
          "Who is the person we pay rent to?",
          ("My old landlord {d} never returned the deposit, I'm still annoyed about it.",
           "Rent is going up again next year, apparently everyone in the building got the letter.")),
    _Kind("teacher's name", _pick(SURNAMES),
          "Our son's class teacher this year is Ms. {a}; parents' evening is in a few weeks.",
          "What's the name of our son's class teacher?",
          "Who's in charge of our boy's classroom this school year?",
          ("Mr. {d}, the PE teacher, wants the kids to bring trainers every Tuesday.",
           "The school newsletter says the class teachers are swapping rooms after half term.")),
    _Kind("parking spot", lambda r: f"{r.choice('ABCD')}{r.randint(1, 4)}-{r.randint(100, 299)}",
          "My parking spot at the new office is {a}, down in the basement next to the lifts.",
          "What's my parking spot at the new office?",
          "Where do I leave the car at work now that we've moved buildings?",
          ("Visitor parking at the office is always full, {d} was the only free bay this morning.",
           "Parking in town on a Saturday is impossible, we ended up walking twenty minutes.")),
    _Kind("anniversary booking", _pick(RESTAURANTS),
          "We booked {a} for our anniversary dinner, a table for two at eight.",
          "Which restaurant did we book for our anniversary?",
          "Where are we eating to celebrate another year of being married?",
          ("We tried {d} last weekend, the food was good but the service was painfully slow.",
           "The new pizza place round the corner is always packed, we couldn't get a table.")),
    _Kind("new manager", _pick(FIRST_NAMES),
          "My new manager is called {a}, coming over from the Berlin team and starting on Monday.",
          "What's my new manager's name?",
          "Who's my new boss, the one transferring from Germany?",
          ("My old manager {d} sent me a lovely message about the promotion.",
           "The managers have been in meetings all week, something about the reorganisation.")),
    _Kind("blood type", _pick(BLOOD_TYPES),
          "The clinic finally told me my blood type: it's {a}, which I'm writing down somewhere safe.",
          "What's my blood type?",
          "If I ever needed a transfusion, which kind would match me?",
          ("My dad's blood type is {d}, he donates every few months.",
           "The blood donation van was outside the supermarket today and there was a huge queue.")),
    _Kind("passport number", lambda r: r.choice(CAPS) + _digits(8)(r),
          "My new passport number is {a}; I need it for the visa form and I never remember it.",
          "What's my passport number?",
          "Which ID goes on the entry application for my travel document?",
          ("My old passport expires next month, I'm glad the new one arrived in time.",
           "The form asked for my partner's passport number as well, {d} I think, I'll double-check.")),
    _Kind("storage unit", lambda r: f"{r.choice(CAPS)}-{r.randint(100, 499)}",
          "The boxes from the move are in storage unit {a} at the SafeBox place on the ring road.",
          "What's the number of our storage unit?",
          "Where exactly did we stash the stuff that wouldn't fit in the new place?",
          ("A friend rents unit {d} at the same storage place, he says it floods sometimes.",
           "We still have far too many boxes, I think half of them are books.")),
    _Kind("book club pick", _pick(NOVELS),
          "Our book club picked {a} for next month; I need to get a copy before the library runs out.",
          "Which book did the book club pick for next month?",
          "What novel am I supposed to be reading before the next reading-group meeting?",
          ("I finally finished {d}, the ending felt a bit rushed.",
           "The library has a waiting list for everything popular this month.")),
    _Kind("marathon number", _digits(4),
          "My bib number for the city marathon is {a}; they emailed it this morning and I'm strangely proud of it.",
          "What's my bib number for the city marathon?",
          "What number will be pinned to my shirt for the big race?",
          ("My running buddy got bib {d} for the half marathon, same day as mine.",
           "The marathon route closes half the roads in town, so plan around it.")),
    _Kind("spare key", _pick(HIDING_SPOTS),
          "We hid the spare key under the {a} in the back garden, so nobody gets locked out again.",
          "Where is the spare key hidden?",
          "I'm locked out of the house, where did we stash the backup way in?",
          ("My neighbour keeps her spare key under the doormat, which feels like asking for trouble.",
           "I lost my car key for an hour this morning, it was in the fridge somehow.")),
    _Kind("insurance policy", lambda r: f"POL-{r.randint(10000, 99999)}-{r.choice(CAPS)}",
          "Our home insurance policy number is {a}, in case we need to make a claim after the storm.",
          "What's our home insurance policy number?",
          "If the roof gets damaged, which reference do I quote to the insurer?",
          ("The car insurance renewal came in, policy {d}, and the price went up again.",
           "Insurance companies always take forever to answer the phone.")),
    _Kind("piano teacher", _pick(FIRST_NAMES),
          "Our daughter's piano teacher is {a}; lessons are at the teacher's house every Wednesday after school.",
          "What's the name of our daughter's piano teacher?",
          "Who teaches our girl to play the keys?",
          ("The guitar teacher, {d}, cancelled again this week.",
           "Piano practice at home is a battle every single evening.")),
    _Kind("plant sitter", _pick(FIRST_NAMES),
          "Our neighbour {a} offered to water the garden and feed the fish while we're away.",
          "Which neighbour is watering the garden while we're away?",
          "Who's looking after the plants and the pond when we go on holiday?",
          ("Our neighbour {d} across the road is building a huge extension, the noise is constant.",
           "The neighbours had a barbecue last night and the smoke came straight into our garden.")),
    _Kind("vet clinic", _pick(VETS),
          "The puppy's vet is at {a}; they were brilliant with her vaccinations.",
          "Which vet clinic does the puppy go to?",
          "Where do we take the little dog for her jabs and check-ups?",
          ("{d} is closer to us, but everyone says they're overpriced.",
           "The vet bill for my sister's cat was eye-watering.")),
    _Kind("sofa delivery", lambda r: "1Z" + "".join(r.choice(CAPS + string.digits) for _ in range(8)),
          "The tracking number for the new sofa delivery is {a}; it's supposed to arrive this week.",
          "What's the tracking number for the sofa delivery?",
          "How can I check where the couch we ordered is right now?",
          ("The parcel with tracking number {d} turned out to be the neighbours', the courier got confused.",
           "Deliveries round here always turn up while I'm in the shower.")),
    _Kind("coworking door code", lambda r: _digits(4)(r) + "#",
          "The door code at the coworking space is {a}; the buzzer is broken so that's the only way in.",
          "What's the door code at the coworking space?",
          "How do I get into the shared office building when nobody answers?",
          ("The coworking space has terrible coffee but at least the chairs are comfortable.",
           "My gym's door code changed to {d} and nobody told me.")),
    _Kind("laptop asset tag", lambda r: f"TG-{r.randint(100, 9999):05d}",
          "My work laptop's asset tag is {a}; IT needs it for the warranty repair on the keyboard.",
          "What's the asset tag on my work laptop?",
          "Which identifier does the help desk want for fixing my company computer?",
          ("My colleague's laptop {d} died completely, she lost a whole day of work.",
           "The new laptops IT ordered are still stuck in customs.")),
    _Kind("school pickup time", _day_time,
          "School pickup for the kids moved to {a} on the new timetable, so I need to leave work early that day.",
          "When is the new school pickup time?",
          "When do I have to collect the children under the new schedule?",
          ("Swimming lessons are on {d}, which clashes with my team meeting.",
           "The school run traffic this morning was the worst I've seen.")),
    _Kind("nephew's name", _pick(FIRST_NAMES),
          "My brother's baby was born last night, and they named the little one {a}! Everyone is doing well.",
          "What's the name of my brother's new baby?",
          "What did my sibling and his wife call their newborn?",
          ("My friend's toddler {d} started nursery this week and cried the whole time.",
           "Babies are so expensive, my brother is already panicking about nappies.")),
    _Kind("wedding song", _pick(SONGS),
          "Our first dance at the wedding was to {a}, and I still tear up whenever it comes on.",
          "What song was our first dance at the wedding?",
          "Which tune did we sway to right after getting married?",
          ("The radio played {d} four times on the drive today.",
           "The wedding playlist for my cousin's party is mostly eighties pop.")),
    _Kind("rabbit's name", _pick(PET_NAMES),
          "My daughter's new rabbit is called {a}; he's tiny, brown and terrified of the hoover.",
          "What's the name of my daughter's rabbit?",
          "What did our girl name her little bunny?",
          ("The rabbit hutch needs a new roof before winter.",
           "My niece's hamster {d} escaped again and was found in a shoe.")),
    _Kind("removal company", _pick(MOVERS),
          "The removal company we hired for the house move is {a}; they're coming on the first with two vans.",
          "Which removal company did we hire for the house move?",
          "Who's carrying all our furniture to the new place?",
          ("{d} quoted us double, so we turned them down.",
           "Moving day is going to be chaos, we haven't even started packing the kitchen.")),
    _Kind("new address", lambda r: f"{r.randint(2, 98)} {r.choice(STREETS)}",
          "Our new address is {a}, the house with the green door at the end of the cul-de-sac.",
          "What's our new address?",
          "Where should friends send post to now that we've moved?",
          ("The previous owners still get letters, mostly forwarded from {d}.",
           "I keep writing our old address on forms out of habit.")),
    _Kind("rose variety", _pick(ROSES),
          "The climbing rose we planted by the back fence is a {a}, apricot-coloured and supposedly very fragrant.",
          "Which rose variety did we plant by the back fence?",
          "What kind of flowering climber did we put in out back?",
          ("The garden centre was selling {d} roses at half price but they looked half dead.",
           "Aphids are all over the roses again, I need to deal with them this weekend.")),
    _Kind("electricity account", _digits(10),
          "Our electricity account number is {a}; the supplier always asks for it whenever I call about the bill.",
          "What's our electricity account number?",
          "What reference does the power company want when I phone about what we owe?",
          ("The gas bill came in and it's almost double last year's.",
           "My mum's energy account number is {d}, she asked me to sort out her meter reading.")),
    _Kind("train seat", lambda r: f"coach {r.choice('ABCDEFGHJ')}, seat {r.randint(11, 79)}",
          "For the train to Edinburgh on Friday I'm in {a}, a window seat facing forward.",
          "Which seat do I have on the train to Edinburgh?",
          "Where am I sitting on the rail journey up to Scotland?",
          ("Last time the train was so full I stood from York onwards.",
           "My colleague is in {d} on the same train, we might swap so we can sit together.")),
    _Kind("Tuscan wine", _pick(WINES),
          "The wine we loved at that vineyard in Tuscany was {a}; we should order a case.",
          "What was the wine we loved at the vineyard in Tuscany?",
          "Which bottle from our Italian holiday did we want to buy more of?",
          ("We had a {d} at dinner but it was far too expensive for what it was.",
           "Wine tasting tours are everywhere now, even in the middle of the city.")),
    _Kind("shoe size", lambda r: f"EU {r.randint(26, 38)}",
          "Our son's feet grew again, his shoe size is now {a}, so the school shoes need replacing.",
          "What's our son's shoe size now?",
          "What size footwear should I buy for our boy?",
          ("Our daughter is still in {d} but she says her trainers pinch.",
           "Shoe shops are impossible on the last weekend of the summer holidays.")),
]


class _Slots(dict):
    """Fills template slots lazily, one random value per slot name per message pair."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng

    def __missing__(self, key: str) -> str:
        value = SUBSTITUTES[self["ingredient"]] if key == "ingredient2" else self.rng.choice(SLOTS[key])
        self[key] = value
        return value


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def _filler(rng: random.Random, topic: str) -> tuple[str, str]:
    user, replies = rng.choice(TOPICS[topic])
    slots = _Slots(rng)
    opener = rng.choice(USER_OPENERS)
    body = user.format_map(slots)
    if opener:
        body = body if body[:1].isupper() else _capitalised(body)
    user_text = opener + body + rng.choice(USER_CLOSERS).format_map(slots)
    reply = _capitalised(rng.choice(replies).format_map(slots))
    extra = [rng.choice(REPLY_OPENERS), rng.choice(REPLY_CLOSERS)]
    if len(re.findall(r"[.!?] ", reply)) and all(extra):  # at most three sentences in all
        extra[rng.randrange(2)] = ""
    reply = extra[0] + reply + extra[1]
    return user_text, reply


def conversation(turns: int = 320, facts: int = 40, seed: int = 0) -> Conversation:
    """A ``turns``-pair chat with ``facts`` planted facts, each asked about at least 30 turns later."""
    if facts > len(KINDS):
        raise ValueError(f"at most {len(KINDS)} facts (one per kind of fact), got {facts}")
    last_fact_turn = turns - MIN_GAP_TURNS  # a fact at turn t is asked about at turn t + 30 or later
    if last_fact_turn < facts:
        raise ValueError(f"{turns} turns leave too little room for {facts} facts asked {MIN_GAP_TURNS} turns later")
    rng = random.Random(seed)
    kinds = rng.sample(KINDS, facts)
    fact_turns = sorted(rng.sample(range(1, last_fact_turn + 1), facts))
    rng.shuffle(kinds)
    fact_at = {t: i for i, t in enumerate(fact_turns)}

    # Distractors: one near each fact (within 8 turns, either side) and up to two anywhere.
    distractor_at: dict[int, tuple[int, str]] = {}
    for i, t in enumerate(fact_turns):
        free = [u for u in range(turns) if u not in fact_at and u not in distractor_at]
        near = [u for u in free if abs(u - t) <= 8]
        chosen = [rng.choice(near)] if near else []
        templates = list(kinds[i].distractors)
        extra = min(rng.randint(0, 2), len(templates) - len(chosen), len(free) - len(chosen))
        chosen += rng.sample([u for u in free if u not in chosen], max(extra, 0))
        rng.shuffle(templates)
        for u, template in zip(chosen, templates[: len(chosen)], strict=True):  # no template twice
            distractor_at[u] = (i, template.replace("{d}", kinds[i].gen(rng)))

    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    previous_topic = ""
    for t in range(turns):
        if t in fact_at:
            kind = kinds[fact_at[t]]
            user = rng.choice(FACT_OPENERS) + kind.fact  # "{a}" is filled in below
            reply = rng.choice(ACKS).format(label=kind.label)
        elif t in distractor_at:
            user = distractor_at[t][1]
            reply = rng.choice(DISTRACTOR_REPLIES)
        else:
            topic = rng.choice([name for name in TOPICS if name != previous_topic])
            previous_topic = topic
            user, reply = _filler(rng, topic)
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": reply})

    # Answers: drawn so that none occurs (case-insensitively) in any other message or in another answer.
    corpus = "\n".join(m["content"] for m in messages).lower()
    answers: list[str] = []
    for kind in kinds:
        for _ in range(1000):
            answer = kind.gen(rng)
            low = answer.lower()
            if low in corpus or low in kind.direct.lower() or low in kind.para.lower():
                continue
            if any(low in other.lower() or other.lower() in low for other in answers):
                continue
            break
        else:
            raise AssertionError(f"no unique answer found for the {kind.label}")
        answers.append(answer)

    paraphrased = [i < facts // 2 for i in range(facts)]
    rng.shuffle(paraphrased)
    questions = []
    for t, i in fact_at.items():
        evidence = 1 + 2 * t
        messages[evidence]["content"] = messages[evidence]["content"].replace("{a}", answers[i])
        asked_turn = rng.randint(t + MIN_GAP_TURNS, turns)  # turns: after the last message
        text = kinds[i].para if paraphrased[i] else kinds[i].direct
        questions.append(Question(position=1 + 2 * asked_turn, text=text, answer=answers[i], evidence=evidence))
    questions.sort(key=lambda q: (q.position, q.evidence))
    conv = Conversation(messages=messages, questions=questions)
    _check(conv)
    return conv


def _check(conv: Conversation) -> None:
    messages = conv.messages
    assert messages[0]["role"] == "system" and len(messages) % 2 == 1
    for k, message in enumerate(messages[1:], start=1):
        assert message["role"] == ("user" if k % 2 else "assistant"), k
        assert "{" not in message["content"] and "}" not in message["content"], message
    lowered = [m["content"].lower() for m in messages]
    for q in conv.questions:
        assert messages[q.evidence]["role"] == "user", q
        assert q.answer in messages[q.evidence]["content"], q
        assert q.answer.lower() not in q.text.lower(), q
        holders = [k for k, text in enumerate(lowered) if q.answer.lower() in text]
        assert holders == [q.evidence], (q, holders)
        assert q.position >= q.evidence + 2 * MIN_GAP_TURNS, q
        assert q.position <= len(messages) and q.position % 2 == 1, q
        assert messages[q.position - 1]["role"] == "assistant", q
    assert len({q.evidence for q in conv.questions}) == len(conv.questions)


def _words(text: str) -> int:
    return len(text.split())


if __name__ == "__main__":
    start = time.perf_counter()
    conv = conversation()
    elapsed_ms = (time.perf_counter() - start) * 1e3
    msgs = conv.messages
    users = [m["content"] for m in msgs[1:] if m["role"] == "user"]
    replies = [m["content"] for m in msgs[1:] if m["role"] == "assistant"]
    gaps = [(q.position - q.evidence) // 2 for q in conv.questions]
    print(f"{len(msgs)} messages ({len(users)} turns), {len(conv.questions)} questions, built in {elapsed_ms:.1f} ms")
    print(f"  words per message: user {sum(map(_words, users)) / len(users):.1f}, "
          f"assistant {sum(map(_words, replies)) / len(replies):.1f}, "
          f"distinct user messages {len(set(users))}/{len(users)}")
    paraphrases = sum(q.text in {k.para for k in KINDS} for q in conv.questions)
    print(f"  questions: {len(conv.questions) - paraphrases} reuse the fact's key words, {paraphrases} paraphrase it")
    print(f"  turns from fact to question: min {min(gaps)}, median {sorted(gaps)[len(gaps) // 2]}, max {max(gaps)}")
    for q in conv.questions[:: max(1, len(conv.questions) // 5)][:5]:
        print(f"\n  Q @{q.position}: {q.text}\n    answer: {q.answer!r}\n    evidence @{q.evidence}: "
              f"{msgs[q.evidence]['content']}")
